"""``python -m llama_jax.train --config configs/pretrain/tiny.py --config.run_dir=/tmp/run --config.train.steps=50``

Any config key can be overridden with ``--config.<section>.<key>=<value>``; unknown keys are an error.
"""

from absl import app, logging
from ml_collections import config_flags

from llama_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/<stage>/<name>.py)",
                                          lock_config=True)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # ml_collections' way of saying "no such key"
        key = str(e).strip("'\"")
        culprits = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        raise SystemExit(f"FATAL: unknown config key {key!r} in {culprits or argv[1:]}; the config file lists every "
                         "key (llama_jax/train/defaults.py documents them)") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<key>=<value>")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/pretrain/tiny.py")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    summary = loop.run(_CONFIG.value)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
