"""What seqlab can run, listed: ``python -m seqlab`` (or ``python -m seqlab.train --list``).

Three sections: the registered mixers (name, kind, the paper each implements), the data tasks (name, kind, what
they are) and the config files of a configs directory with their variants (``--config=configs/<file>.py:<variant>``).
The configs directory defaults to the ``configs/`` beside the installed package (a source checkout) and falls back to
``./configs``.
"""

from __future__ import annotations

import glob
import os
import re

from seqlab import config as config_lib, data, mixers

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_configs_dir() -> str:
    """``configs/`` of the source checkout the package runs from, else ``./configs``."""
    beside_package = os.path.join(PACKAGE_ROOT, "configs")
    return beside_package if os.path.isdir(beside_package) else os.path.abspath("configs")


def mixer_rows() -> list[tuple[str, str, str]]:
    """(name, kind, paper) of every registered mixer, sorted by name."""
    rows = []
    for name in mixers.available():
        info = mixers.info(name)
        rows.append((name, info.kind or "-", info.paper or "-"))
    return rows


def task_rows() -> list[tuple[str, str, str]]:
    """(name, kind, first docstring sentence) of every registered data task."""
    rows = []
    for name in data.available_tasks():
        cls = data.get_task_class(name)
        rows.append((name, cls.kind, _first_sentence(cls.__doc__)))
    return rows


def config_rows(configs_dir: str) -> list[tuple[str, str, str]]:
    """(path relative to the working directory, first docstring sentence, its variants joined by ", ") of every
    config file in `configs_dir`. A file without ``VARIANTS`` lists "-"."""
    rows = []
    for path in sorted(glob.glob(os.path.join(configs_dir, "*.py"))):
        module = config_lib.load_config_module(path)
        variants = ", ".join(getattr(module, "VARIANTS", {})) or "-"
        rows.append((os.path.relpath(path), _first_sentence(module.__doc__), variants))
    return rows


def listing(configs_dir: str | None = None) -> str:
    """The three sections as aligned plain-text tables."""
    configs_dir = configs_dir or default_configs_dir()
    sections = [
        ("Mixers (model.mixers)", ("name", "kind", "paper"), mixer_rows()),
        ("Tasks (data.task)", ("name", "kind", "description"), task_rows()),
    ]
    configs = "\n".join(f"  {path}  {about}\n      variants: {variants}" for path, about, variants in
                        config_rows(configs_dir))
    tables = [f"{title}\n{_table(header, rows)}" for title, header, rows in sections]
    return "\n\n".join([*tables, f"Configs in {configs_dir} (--config=FILE[:VARIANT][,tiny])\n{configs}"])


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = []
    for row in (header, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)] + [str(row[-1])]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _first_sentence(doc: str | None, limit: int = 100) -> str:
    """The docstring's first sentence on one line, cut to `limit` characters."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0].rstrip(".:")
    return (sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "...") or "-"
