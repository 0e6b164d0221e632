"""The ``hprune`` subcommands, one module each (the Diffusers CLI pattern).

Every module has ``register(subparsers)``, which adds its sub-parser and sets ``func=run``,
and ``run(args) -> int``. :mod:`diffusers_hprune.cli` builds the parser from :data:`COMMANDS`
and dispatches; :mod:`.options` holds the options several commands share.
"""

from diffusers_hprune.commands import (
    analyze,
    budget,
    compress,
    convert_lora,
    demo,
    distill,
    evaluate,
    export,
    inspect,
    plan,
    push,
    quantize,
    report,
    toy_train,
)

# In the order `hprune --help` lists them.
COMMANDS = (inspect, budget, demo, evaluate, analyze, plan, report, quantize, export, convert_lora, push, compress, distill, toy_train)

__all__ = ["COMMANDS"]
