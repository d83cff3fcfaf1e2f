"""Chat with a checkpoint in the Llama 3 dialog format, from a terminal or a pipe.

    python -m llama_jax.chat --checkpoint PATH [--system "You are a helpful assistant."] [--tokenizer byte] [--mesh ...]
    python -m llama_jax.chat --checkpoint BASE --adapter runs/sft-lora      # low-rank adapters, unmerged, over BASE

Each input line is a user turn; the reply streams as it is generated. ``/reset`` starts a new dialog
(keeping the system prompt), ``/exit`` or end of input quits. A reply that starts with <|python_tag|>
is a tool call (Llama 3.1 ends it with <|eom_id|>): it is shown as ``[tool call] ...`` and the next
input line is taken as the tool's output (an ``ipython`` turn), after which the assistant continues.

``--tools code_interpreter,brave_search,wolfram_alpha`` runs the tool loop of `llama_jax.tools` instead:
the system prompt turns the tools on, code runs in the sandboxed interpreter, and search / math calls
(no service is built in) ask for their result on the terminal; ``--max-tool-calls`` caps each turn.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

from llama_jax import cli, sharding
from llama_jax import generate as gen
from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError, DataError, TokenizerError
from llama_jax.tools import interpreter, prompts, runner

USER, ASSISTANT, TOOL = "user> ", "assistant> ", "tool> "


class Chat:
    """A dialog with one model: ``say(role, content)`` adds a turn and streams the assistant's reply."""

    def __init__(self, params, cfg: ModelConfig, tokenizer, *, system: str | None = None, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 mesh=None, out=None):
        self.params, self.cfg, self.tokenizer, self.out = params, cfg, tokenizer, out or sys.stdout
        self.system = system
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_new_tokens, self.seed, self.mesh = max_new_tokens, seed, mesh
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, role: str, content: str) -> dict:
        """Adds a ``user`` or ``ipython`` (tool output) turn; streams, records and returns the assistant's reply.
        A turn that cannot be encoded or does not fit raises (DataError, TokenizerError) and leaves the dialog as
        it was."""
        tok = self.tokenizer
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (tokens per reply), got {self.max_new_tokens}")
        turn = {"role": role, "content": content}
        prompt, _ = tok.encode_dialog([*self.messages, turn], add_generation_prompt=True)
        max_new = min(self.max_new_tokens, self.cfg.max_seq_len - len(prompt))
        if max_new < 1:
            raise DataError(f"the dialog has {len(prompt)} tokens and fills the model's context (max_seq_len "
                            f"{self.cfg.max_seq_len}); /reset to start over")
        self.messages.append(turn)
        self.seed += 1  # a fresh sample each turn, reproducible from the starting seed
        steps = gen.stream(self.params, self.cfg, [prompt], max_new, seed=self.seed, stop_ids=tok.stop_ids,
                           mesh=self.mesh, vocab_size=tok.vocab_size, **self.sampling)
        tokens = (new[0] for new in steps)
        self.out.write(ASSISTANT)
        first = next(tokens, None)
        tool_call = first == tok.special_id("python_tag")
        if tool_call:
            self.out.write("[tool call] ")
        elif first is not None:
            tokens = itertools.chain([first], tokens)
        content = itertools.takewhile(lambda t: t not in tok.stop_ids, tokens)
        ids = gen.print_stream(tok, content, self.out)
        self.out.write("\n")
        reply = {"role": "assistant", "content": tok.decode(ids), "tool_call": tool_call}
        self.messages.append(reply)
        return reply

    def say_with_tools(self, content: str, tools: dict, max_tool_calls: int = 5) -> list[dict]:
        """Adds a user turn and runs the tool loop (`llama_jax.tools.runner`) until the assistant has answered."""
        before = len(self.messages)
        self.messages.append({"role": "user", "content": content})
        generate = runner.model_generator(self.params, self.cfg, self.tokenizer, max_new_tokens=self.max_new_tokens,
                                          seed=self.seed, **self.sampling)
        self.seed += max_tool_calls + 1  # one seed per generation of the turn
        try:
            return runner.run_turn(self.messages, generate, self.tokenizer, tools, max_tool_calls=max_tool_calls,
                                   out=self.out)
        except DataError:
            del self.messages[before:]
            raise


def terminal_tools(names: Sequence[str]) -> dict:
    """The tools for ``--tools``: the sandboxed interpreter; search and math answered on the terminal."""
    def ask(name: str):
        return lambda query: input(f"[{name} result for {query!r}]> ")

    return {name: interpreter.code_interpreter if name == "code_interpreter" else ask(name) for name in names}


parser = cli.parser("python -m llama_jax.chat", __doc__.split("\n")[0])
cli.add_checkpoint(parser)
cli.add_adapter(parser)
cli.add_tokenizer(parser)
cli.add_sampling(parser)
cli.add_max_new_tokens(parser)
cli.add_seed(parser)
cli.add_mesh(parser)
parser.add_argument("--system", default=None, help="system prompt")
parser.add_argument("--tools", default=None, help="turn on tools: a comma-separated subset of "
                    f"{','.join(prompts.BUILTIN_TOOLS)}")
parser.add_argument("--max-tool-calls", type=int, default=5, help="tool calls per turn at most (with --tools)")


def run(args: argparse.Namespace) -> dict:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 (tokens per reply), got {args.max_new_tokens}")
    if hasattr(sys.stdin, "reconfigure"):  # keep bytes that are not UTF-8 (terminal_text reports them), never crash
        sys.stdin.reconfigure(errors="surrogateescape")
    tool_names = [name.strip() for name in args.tools.split(",") if name.strip()] if args.tools else []
    system = prompts.system_prompt(tool_names, instruction=args.system) if tool_names else args.system
    tools = terminal_tools(tool_names)
    params, cfg, tok = gen.load_model(args.checkpoint, args.tokenizer, args.adapter)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    chat = Chat(params, cfg, tok, system=system, max_new_tokens=args.max_new_tokens, mesh=mesh,
                **cli.sampling_kwargs(args))
    role, prompt, turns = "user", USER, 0
    for number in itertools.count(1):
        try:
            line = cli.terminal_text(input(prompt), f"input line {number}")
        except EOFError:
            print()
            return {"turns": turns}
        if line.strip() == "/exit":
            return {"turns": turns}
        if line.strip() == "/reset":
            chat.reset()
            role, prompt = "user", USER
            continue
        try:
            if tools:
                chat.say_with_tools(line, tools, args.max_tool_calls)
                turns += 1
                continue
            reply = chat.say(role, line)
        except (DataError, TokenizerError) as e:  # this turn only: the dialog goes on
            print(f"error: {e}")
            continue
        turns += 1
        role, prompt = ("ipython", TOOL) if reply["tool_call"] else ("user", USER)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
