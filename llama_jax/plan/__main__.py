"""``python -m llama_jax.plan``: will a run fit (``llama_jax.plan.command``; ``--help`` lists the flags)."""

import os
import sys

from llama_jax.plan import memory
from llama_jax.plan.command import main


def _simulated_devices(argv: list[str]) -> int | None:
    """Devices --aot without --topology needs simulated on the CPU: the --mesh (or --config.mesh) flag's product (XLA
    reads the flag when the backend starts)."""
    for i, arg in enumerate(argv):
        spec = (arg.split("=", 1)[1] if arg.startswith(("--mesh=", "--config.mesh=")) else argv[i + 1]
                if arg in ("--mesh", "--config.mesh") and i + 1 < len(argv) else None)
        if spec and "-1" not in spec:
            return memory.mesh_device_count(spec)
    return None


if __name__ == "__main__":
    count = _simulated_devices(sys.argv) if "--aot" in sys.argv and "--topology" not in sys.argv else None
    if count and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    raise SystemExit(main())
