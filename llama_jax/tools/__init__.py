"""Tool use as Llama 3.1 does it: prompts, call parsing, a sandboxed code interpreter, the tool loop.

    from llama_jax import tools
    messages = tools.tool_messages(["code_interpreter"], instruction="Be brief.")
    messages.append({"role": "user", "content": "What is 2**100?"})
    tools.run_turn(messages, tools.model_generator(params, cfg, tok), tok,
                   {"code_interpreter": tools.code_interpreter})

Modules: `prompts` (system / user messages that describe the tools), `calls` (parse and write tool
calls), `interpreter` (run model-written Python in a locked-down child process), `runner` (the loop),
`synthetic` (a small tool-use SFT dataset).
"""

from llama_jax.tools.calls import ToolCall, builtin_call, code_call, custom_call, parse, parse_message, to_message
from llama_jax.tools.interpreter import Limits, code_interpreter, run_python
from llama_jax.tools.prompts import BUILTIN_TOOLS, ToolSpec, tool_messages, tool_spec
from llama_jax.tools.runner import execute, model_generator, run_turn

__all__ = [
    "BUILTIN_TOOLS", "Limits", "ToolCall", "ToolSpec", "builtin_call", "code_call", "code_interpreter", "custom_call",
    "execute", "model_generator", "parse", "parse_message", "run_python", "run_turn", "to_message", "tool_messages",
    "tool_spec",
]
