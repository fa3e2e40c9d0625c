"""Sample text from a bytes language model trained by `python -m seqlab.train`:

    python -m seqlab.sample --workdir=DIR --prompt="The " [--max_new_tokens=200 --temperature=0.8 --top_k=40 --seed=0]

Prints the prompt followed by the sampled continuation (UTF-8, invalid bytes replaced); a workdir whose task is not
byte-level text (e.g. MQAR, whose tokens are ids) is refused in one line before anything is built. The work is
`seqlab.generate.sample_text`; this module only parses flags. --temperature=0 decodes greedily; --top_k=0 samples
from every byte.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from seqlab.generate import check_byte_level, sample_text


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module defines nothing)."""
    flags.DEFINE_string("workdir", None, "Run directory of a trained bytes model (its latest checkpoint).")
    flags.DEFINE_string("prompt", None, "Text to continue (non-empty).")
    flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 40, "Sample from the top_k most likely bytes; 0 = all of them.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.mark_flags_as_required(["workdir", "prompt"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs the restore at INFO
    f = flags.FLAGS
    try:
        check_byte_level(f.workdir)
    except ValueError as error:
        sys.exit(f"seqlab.sample: {error}")
    text = sample_text(
        f.workdir, f.prompt, max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_k=f.top_k or None,
        seed=f.seed,
    )  # fmt: skip
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
